"""Running machines: process, sockets, console, probes, stop escalation."""
