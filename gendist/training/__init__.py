"""The one training loop (loop.py) every family runs through, and the run-folder, data, checkpoint
and metric plumbing it composes (session.py and the modules it names)."""
