"""How the router learns which engine instances exist.

Two sources feed one registry (``router.server.load_view.LoadView``):

* static: ``--instances`` on the command line, plus admin add/remove (embedded mode);
* etcd: instances register themselves under a lease (``registrar``) and the
  router watches the key prefix (``watcher``).

Importing this package has no side effects.
"""
