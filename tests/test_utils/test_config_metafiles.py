"""convneur_mm.utils.config_metafiles: a config's `mmdet::` bases resolved with
each package metafile parsed once, to the same config."""
import json
import subprocess
import sys

from ..paths import REPO

# a fresh process: the test session itself loads configs inside the block
SCRIPT = r'''
import json
from collections import Counter
from mmengine.config import Config, utils
from convneur_mm.apis.launch import load_config
from convneur_mm.utils.config_metafiles import metafiles_read_once

CONFIG = 'configs/cascade_rcnn_convneur_m3_1x_coco.py'
raw, reads = utils.load, Counter()
def counted(path, *args, **kwargs):
    reads[str(path)] += 1
    return raw(path, *args, **kwargs)
utils.load = counted

plain = Config.fromfile(CONFIG).to_dict()
plain_reads, plain_files = sum(reads.values()), len(reads)
reads.clear()
with metafiles_read_once():
    once = Config.fromfile(CONFIG).to_dict()
    with metafiles_read_once():  # nested: the outer cache
        Config.fromfile(CONFIG)
once_reads, most = sum(reads.values()), max(reads.values())
restored = utils.load is counted
reads.clear()
loaded = load_config(CONFIG).to_dict()
loaded.pop('launcher'), loaded.pop('work_dir')
print(json.dumps(dict(
    same=once == plain, loaded_same=loaded == {k: v for k, v in plain.items()
                                               if k not in ('launcher', 'work_dir')},
    plain_reads=plain_reads, plain_files=plain_files, once_reads=once_reads, most=most,
    restored=restored, loader_reads=sum(reads.values()))))
'''


def test_each_metafile_is_parsed_once_and_the_config_is_the_same():
    done = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result['same'] and result['loaded_same'] and result['restored'], result
    # four mmdet:: bases: MMEngine parses the package's metafiles for each of them
    assert result['plain_files'] > 50 and result['plain_reads'] == 4 * result['plain_files']
    assert result['once_reads'] == result['plain_files'] and result['most'] == 1, result
    assert result['loader_reads'] == result['plain_files'], result
