"""The job engine every job kind plugs into: run config, pure scheduling policy, actor pool, the
shard skeleton, the runner, the ledger and storage. See ARCHITECTURE.md for the contract."""
