"""Serving `vita-engine serve` beyond one machine (docs/ray-serve.md).

`vita_engine.serving.ray` runs replicas of the real-time server on Ray Serve (the `[ray]` extra:
`pip install "vita-engine[ray]"`): `vita-engine serve --ray`, or the Serve application
`vita_engine.serving.ray:app`. `vita_engine.serving.core` holds the parts that need no Ray (the
replica's engine + app, its health check and drain, session placement, the proxy middleware), so
that `vita-engine serve` without `--ray` never imports Ray.
"""
