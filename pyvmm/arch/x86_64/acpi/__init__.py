"""ACPI tables for the x86_64 machine: an AML encoder (:mod:`.aml`) and the static tables (:mod:`.tables`)
a Linux guest reads through ``boot_params.acpi_rsdp_addr`` (ACPI 6.5, chapters 5, 6 and 20)."""
