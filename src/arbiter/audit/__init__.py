"""The audit log: records, the hash-chained store, the writer, verification and export."""
