"""Serving the app on a Ray cluster: an ingress with the UI and APIs, model replicas behind it.

    app.py        the Serve application builder (deployments, resources, autoscaling)
    ingress.py    the Ingress deployment: build_demo() on models it does not hold
    remote.py     the ingress side: RemoteModelManager, RemoteRunner (the Runner seam, one call
                  per reply), recovery when a replica is lost
    replica.py    the FalconMamba deployment: models, batching schedulers, prefix caches
    placement.py  which replica holds which token prefix (the routing table)
    router.py     Serve request routers: affinity by prefix for replicas, by session for ingresses
    protocol.py   what travels between ingress and replica
    config.py     ClusterSettings and the settings each side sees
    serve.yaml    the same application for `serve deploy` / `serve run`

Needs Ray Serve (requirements-cluster.txt); nothing else in the package imports this one.
"""
