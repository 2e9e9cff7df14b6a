"""Public ops: validation, torch.library registration, autograd and backend choice."""
