"""Deployment tooling: Serve config loading and validation (``serve_config``), KubeRay RayService manifests
(``kuberay`` renders them and holds the CLI, ``kuberay_checks`` validates them offline) and the local Ray + Serve
cluster launcher (``local_cluster``). Nothing here runs inside a Serve replica.
"""
