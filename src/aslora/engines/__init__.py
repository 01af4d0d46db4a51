"""Engines carry a round's jobs to the clients: in-process here, Flower elsewhere."""
