"""Fault-injection suite: the guarantees of the README's "Guarantees" section, under kills, bad data,
bad configuration, untrusted files, non-finite losses, dead ranks and full disks."""
