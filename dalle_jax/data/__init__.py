"""Image-caption datasets and the input pipeline; see `records.py` for the shared record types."""
