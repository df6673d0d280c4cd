"""The configs that ship with latentcache (installed as `pipeline.configs`; see `latentcache configs`)."""
