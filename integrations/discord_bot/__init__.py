"""``iris discord``: the Discord front end over the shared ``DialogueManager`` (see README.md here)."""
