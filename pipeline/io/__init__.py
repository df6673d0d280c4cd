"""Shard formats: input shard lists, the WebDataset tar reader and writer, latent shard writers and reader."""
