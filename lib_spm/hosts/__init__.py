"""Host adapters: the only code that knows a host's row layout and prompt encoding."""
