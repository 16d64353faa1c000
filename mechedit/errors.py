"""User-facing errors: raised anywhere in the library, printed as one line by the CLI (exit 2)."""


class MecheditError(Exception):
    """An error the user can act on (bad spec, missing checkpoint, unknown fact...)."""


class SpecError(MecheditError):
    """A malformed or impossible spec."""


class CheckpointError(MecheditError):
    """A missing or corrupt checkpoint or world directory."""
