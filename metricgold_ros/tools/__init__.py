"""The ``metricgold`` command line: bag (one or many), infer, eval, bench, init-model."""
