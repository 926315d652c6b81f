"The recipe strings of benchmarks/recipes.py: what each field builds, and clear errors for the wrong ones"
import importlib.util, sys
from pathlib import Path
import pytest, torch
from kdcb.all import *
from kdcb.examples import cnn1d

_spec = importlib.util.spec_from_file_location('recipes', Path(__file__).parents[1] / 'benchmarks' / 'recipes.py')
recipes = importlib.util.module_from_spec(_spec); sys.modules['recipes'] = recipes; _spec.loader.exec_module(recipes)


def test_fields():
    r = recipes.parse_recipe('kd:crd:st:T=2:neg=100:bal=unc:w=0.9:u')
    assert (r['loss'], r['st'], r['T'], r['neg'], r['bal'], r['w'], r['u']) == ('crd', True, '2', 100, 'unc', '0.9', True)
    assert recipes.parse_recipe('kd:T=4:w=0.5')['loss'] == 'soft_target'
    assert recipes.parse_recipe('kd:nce')['loss'] == 'info_nce'


@pytest.mark.parametrize('spec,msg', [
    ('kd:dkd:crd', 'names two losses (decoupled_kd, crd)'), ('kd:bal=foo', 'bal=ratio, bal=unc, bal=grad'),
    ('kd:st', 'st (keep soft_target) goes with nce or crd'), ('kd:nce:neg=10', "neg= is the size of crd's bank"),
    ('kd:nce:T=2', "T= is the output losses' temperature"), ('scratch:bal=ratio', 'scratch takes lr= and x= only'),
    ('kd:zz', "Unknown field 'zz'"), ('kd:T=4:w=0.1+0.4', 'gives one weight per loss'), ('kd:nce:st:w=0.1+0.1+0.1', 'one weight per loss'), ('distil', "must start with 'scratch' or 'kd'")])
def test_errors(spec, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')): recipes.parse_recipe(spec)


def test_callbacks():
    teacher, student = cnn1d(8), cnn1d(3)
    kd = recipes.kd_callback(recipes.parse_recipe('kd:crd:w=0.1'), teacher, student, 1000)
    crd = kd.kd_loss.terms[0].loss
    assert isinstance(crd, CRD) and (crd.num_student_channels, crd.num_teacher_channels, crd.n_negatives) == (6, 16, 872)
    assert (kd.student_layers, kd.teacher_layers, kd.kd_loss.current) == (['6'], ['6'], [0.1])
    assert recipes.crd_bank(16000) == 4096 and recipes.crd_bank(100) == 1
    kd = recipes.kd_callback(recipes.parse_recipe('kd:nce:st:T=2:w=0.5:bal=ratio'), teacher, student, 1000)
    assert [type(t.loss).__name__ for t in kd.kd_loss.terms] == ['InfoNCE', 'SoftTarget'] and kd.kd_loss.terms[1].loss.T == 2.
    assert isinstance(kd.kd_loss.balance, RatioBalance) and kd.kd_loss.current == [0.25, 0.25]
    kd = recipes.kd_callback(recipes.parse_recipe('kd:crd:st:w=0.1+0.8:u'), teacher, student, 16000)
    assert kd.kd_loss.current == [0.1, 0.8] and kd.kd_loss.terms[0].loss.n_negatives == 4096
    kd = recipes.kd_callback(recipes.parse_recipe('kd:T=4:w=0.9:u:bal=unc'), teacher, student, 16000)
    assert isinstance(kd.kd_loss.balance, UncertaintyBalance) and kd.kd_loss.current == [0.9] and kd.student_layers == []
    for spec, layer in (('kd:T=4:w=0.5:bal=grad', student[-1]), ('kd:crd:w=0.5:bal=grad', student[4])): # the last layer every loss reaches
        b = recipes.kd_callback(recipes.parse_recipe(spec), teacher, student, 1000).kd_loss.balance
        assert isinstance(b, GradNorm) and b._shared == list(layer.parameters())
