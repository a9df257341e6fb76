"""Guest memory: guest RAM (one host buffer) and the memslots that map guest frames to host pfns."""
