"""Files of the `make demo` service: a small shop API with a visible bug, and its fix.

`livepatch.demo` copies them into a temporary directory and runs them from there, as a
user's own program would run; nothing here is imported by livepatch itself.
"""
