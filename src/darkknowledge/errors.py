"""The one exception type users see: its message is a single line that names the problem and the fix."""


class DarkKnowledgeError(Exception):
    """A problem with the user's input or files; the CLI prints it as one line, never a traceback."""


class TrainingDiverged(DarkKnowledgeError):
    """The model's outputs became NaN or inf during training (too high a learning rate, usually)."""
