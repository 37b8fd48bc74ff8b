"""The consortium as a service: owners submit and withdraw experts over HTTP, the coordinator admits them,
publishes numbered model versions and keeps a hash-chained audit log, all in one SQL database."""
