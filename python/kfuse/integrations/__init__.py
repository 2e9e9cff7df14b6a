"""Switches other libraries' layers to kfuse's kernels, in place and reversibly.

Each submodule serves one library, which stays optional: nothing here is imported by
``import kfuse``, and a submodule imports its library only when it is itself imported.

- :mod:`kfuse.integrations.peft`: Hugging Face PEFT's LoRA ``Linear`` layers (``fuse(model)`` /
  ``unfuse(model)``).
"""
