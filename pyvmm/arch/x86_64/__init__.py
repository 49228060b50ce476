"""x86_64 machine: memory layout, boot protocol, vCPU state, platform devices."""
