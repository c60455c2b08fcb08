"""Ray glue: local cluster, run storage, Ray Data pipelines, Ray Train and actor pools."""
