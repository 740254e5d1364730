"""The one exception type users see: its message is a single line that names the problem and the fix."""


class DarkKnowledgeError(Exception):
    """A problem with the user's input or files; the CLI prints it as one line, never a traceback."""


class TrainingDiverged(DarkKnowledgeError):
    """The model's outputs became NaN or inf during training (too high a learning rate, usually)."""

    @classmethod
    def in_epoch(cls, epoch: int) -> "TrainingDiverged":
        return cls(f"training diverged in epoch {epoch}: the model's outputs became NaN or inf; use a lower --lr "
                   "(or --weight-decay; distilling at temperature T scales the soft-target gradient by up to T)")


class OtherKindOfRun(DarkKnowledgeError):
    """A run folder holds another kind of model than the one asked for (an image model where a language model is
    expected, or the reverse): refused, never trained over."""
