"""Models EditKit can build without downloading anything (tests, demos, layout checks). No node classes."""
