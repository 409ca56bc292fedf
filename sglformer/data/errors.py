"""The errors of the data package: a dataset that is missing or malformed, and one sample that cannot be read."""


class DatasetError(FileNotFoundError):
    """A dataset folder is missing or malformed; the message says what goes where."""


class UnreadableSampleError(DatasetError):
    """One sample's file cannot be read; the message names the file, its dataset and what to do.

    An exception raised in a DataLoader worker reaches the main process as text: torch builds a new
    one from 'Caught ... Original Traceback ... <type>: <message>'. Only the original message is kept,
    so that the run ends with the same one line whatever the number of workers."""

    def __init__(self, message, path=None):
        last_line = f'\n{type(self).__module__}.{type(self).__qualname__}: '
        if message.startswith('Caught ') and last_line in message:
            message = message.rpartition(last_line)[2].rstrip('\n')
        super().__init__(message)
        self.path = path
