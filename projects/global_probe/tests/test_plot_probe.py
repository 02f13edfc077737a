"""projects/global_probe/tools/plot_probe.py: the probe's result lines read back, grouped,
summarized and plotted; a log without results fails."""
from projects.global_probe.probe.train import parse_result_line, result_line
import importlib.util
import os.path as osp

_spec = importlib.util.spec_from_file_location(
    'plot_probe', osp.join(osp.dirname(osp.abspath(__file__)), '..', 'tools', 'plot_probe.py'))
plot_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_probe)


def _line(variant, seed, val, seconds=30.0, steps=300, step_mb=140.0, size=None):
    return result_line(variant, seed, dict(val_acc=val, train_acc=val, seconds=seconds,
                                           step_mb=step_mb), steps, size)


def test_result_line_round_trips():
    row = parse_result_line(_line('per_layer', 2, 0.9876, seconds=33.4, step_mb=146.4))
    assert row == dict(variant='per_layer', seed=2, size=None, val_acc=0.988,
                       train_acc=0.988, seconds=33.0, ms_per_step=111.0, step_mb=146.0)
    assert parse_result_line(_line('ours', 0, 1.0, size=160))['size'] == 160
    assert parse_result_line('  ours step 100: loss 0.004 val 0.998') is None
    assert parse_result_line('UserWarning: something') is None


def test_table_groups_seeds_and_the_plot_is_written(tmp_path, capsys):
    log = tmp_path / 'probe.log'
    log.write_text('\n'.join(['warning: noise', _line('ours', 0, 1.0), _line('local', 0, 0.46,
                              seconds=15.0), _line('ours', 1, 0.9), _line('local', 1, 0.66,
                              seconds=18.0)]) + '\n')
    out = tmp_path / 'fig.png'
    assert plot_probe.main([str(log), '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert '| ours | 2 | 95.0% (90.0-100.0) | 100 | 140 |' in text
    assert '| local | 2 | 56.0% (46.0-66.0) | 55 | 140 |' in text
    assert text.index('| ours |') < text.index('| local |')  # first-seen order
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_log_without_results_fails(tmp_path, capsys):
    log = tmp_path / 'empty.log'
    log.write_text('Traceback (most recent call last):\n')
    assert plot_probe.main([str(log)]) == 1
    assert 'no probe result lines' in capsys.readouterr().err


def test_runs_of_several_sizes_are_grouped_per_size(tmp_path, capsys):
    """The resolution sweep: one row per variant and size, sizes in the table."""
    log = tmp_path / 'res.log'
    log.write_text('\n'.join([_line('ours', 0, 1.0, size=96), _line('ours', 0, 0.5, size=160,
                                                                  seconds=90.0),
                              _line('nonlocal', 0, 0.55, size=96, seconds=60.0)]) + '\n')
    out = tmp_path / 'res.png'
    assert plot_probe.main([str(log), '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert '| ours | 96 | 1 | 100.0% (100.0-100.0) | 100 | 140 |' in text
    assert '| ours | 160 | 1 | 50.0% (50.0-50.0) | 300 | 140 |' in text
    assert '| nonlocal | 96 | 1 | 55.0% (55.0-55.0) | 200 | 140 |' in text
    assert out.stat().st_size > 0
