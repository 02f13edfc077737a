"""Where the repository is, for tests that run its tools, configs and scripts."""
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
