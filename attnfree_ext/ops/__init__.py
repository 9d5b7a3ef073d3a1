"""The functional ops, one package per op (docs/design.md §1, §6): ``<op>/__init__.py`` holds the public function,
``<op>/reference.py`` the readable pure-PyTorch path and its autograd Function, ``<op>/compiled.py`` the op's
capability record and the registrations (fake kernels, autograd) of its compiled ops. ``common/`` holds what the
ops share: argument checks, dtype rules, capability records, dispatch and the reference paths' helpers.

The public functions are imported from the op packages (``attnfree_ext.ops.aft_full.aft_full``) or from the top
level (``attnfree_ext.aft_full``); this package does not import them, so that ``attnfree_ext.ops.<op>`` always
names the op's package.
"""
