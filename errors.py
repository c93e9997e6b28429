"""The project's error classes. Only a `UserError` reaches a user as a message (it says what to do, and the
app keeps serving); anything else is a bug, logged with its traceback and shown as an internal error.

Each class also derives from the built-in error it refines, so `except ValueError` still catches a
bad input, and callers outside the app (the API, studies) can use either."""


class UserError(Exception):
    """A problem the user can fix: bad input, a missing model, a budget exceeded. The message says what to do."""


class InputError(UserError, ValueError):
    """A value the user gave (a setting, a range, a token index, a box, a manifest field) that cannot be used."""


class ImageLoadError(UserError, ValueError):
    """A file or object that cannot be used as an image; the message says what to do."""


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint's model_type is not one this tool knows how to map to image pixels."""


class ModelLoadError(UserError, RuntimeError):
    """A checkpoint that could not be found or loaded; the message says what to check."""


class CaptureError(UserError, RuntimeError):
    """A capture that cannot be made as asked (beams, a nested capture, nothing recorded); the message says why."""


class CaptureTooLargeError(UserError, MemoryError):
    """A capture that would exceed the memory allowed for it; refused before generating."""


class GenerationOutOfMemoryError(UserError, MemoryError):
    """Generation ran out of memory; what it took has been freed and the model is usable."""


class EvictedError(UserError, LookupError):
    """A session's result was dropped to keep memory bounded."""


class ModelMismatchError(UserError, LookupError):
    """A pass needs the model that made a result, and another one (or none) is loaded."""


class NotReadyError(UserError, LookupError):
    """Something asked for is not there yet: no result, no model, a map not computed."""


class OutOfRangeError(UserError, IndexError):
    """An index past what a run holds: a step, a prompt position, an image or view."""


class SupersededError(UserError, RuntimeError):
    """A newer request of the same session replaced this one before it started."""
