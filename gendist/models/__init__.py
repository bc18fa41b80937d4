"""Plain nn.Modules: architectures only, no distributed or precision code."""
