"""The suite: model/data pairs built and trained in code, and a runner measuring every method across them."""
