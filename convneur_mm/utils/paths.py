"""Where the configs and tools live: ``.mim/`` of the installed package (copies in
a wheel, links to the repository in an editable install), or the repository."""
import os
import os.path as osp

PACKAGE_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS_ENV = 'CONVNEUR_CONFIGS'


def _resource_dir(name: str) -> str:
    installed = osp.join(PACKAGE_DIR, '.mim', name)
    if osp.isdir(installed):
        # an editable install's .mim links to the repository: name the repository's
        return osp.realpath(installed) if osp.islink(installed) else installed
    in_repo = osp.join(osp.dirname(PACKAGE_DIR), name)
    if osp.isdir(in_repo):
        return in_repo
    raise FileNotFoundError(f'convneur_mm ships no {name}/ (looked in {installed} '
                            f'and {in_repo}); reinstall the package')


def config_dir() -> str:
    """The directory holding the shipped configs."""
    return _resource_dir('configs')


def tools_dir() -> str:
    return _resource_dir('tools')


def config_path(name: str) -> str:
    """Absolute path of a shipped config, e.g. ``config_path('cascade_rcnn_convneur_m3_1x_coco.py')``."""
    path = osp.join(config_dir(), name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'no config {name!r} in {config_dir()}')
    return path


def export_config_dir() -> str:
    """Set ``$CONVNEUR_CONFIGS`` (if unset) so that ``{{$CONVNEUR_CONFIGS:}}``
    in ``_base_`` of a user's config resolves to our configs."""
    return os.environ.setdefault(CONFIGS_ENV, config_dir())


def is_remote(path: str) -> bool:
    """A URL or storage-backend path (http://, s3://, petrel://): not checked
    on the local file system, left to MMEngine's file backends."""
    return '://' in path
