"""pyvmm's GDB remote-protocol server: the protocol's framing (rsp), the server (server), the all-stop
control of the vCPUs (control) and what each architecture provides (target).  docs/gdb.md."""
