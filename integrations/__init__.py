"""Front ends other than the terminal: each one drives the shared ``DialogueManager``."""
