"""Training engines: transformers + peft (any host) and Unsloth (CUDA), behind one interface."""
