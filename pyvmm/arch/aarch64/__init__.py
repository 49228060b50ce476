"""aarch64 machine: memory layout, Image loading, device tree, vGIC and vCPU state."""
