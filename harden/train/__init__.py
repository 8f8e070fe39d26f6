"""Fine-tuning: the CTT losses and a plain training loop."""
