"""The command-line face: thin commands over the spec, render, runtime and reconcile layers."""
