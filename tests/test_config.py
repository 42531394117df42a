import pytest
import yaml

from featkd.config import Config, apply_overrides, flatten, load_config
from featkd.errors import ConfigError

QUICKSTART = "configs/quickstart.yaml"


def test_quickstart_config_loads_and_overrides_apply():
    cfg = load_config(QUICKSTART, ["loss.kd.temperature=2", "train.epochs=3", "logger=none"])
    assert isinstance(cfg, Config)
    assert cfg.terms["kd"].params == {"temperature": 2}
    assert cfg.train.epochs == 3
    assert cfg.logger.name == "none"
    assert cfg.teacher[0].model == "cnn_large"
    assert cfg.student.model == "cnn_tiny"


def test_a_shipped_config_is_found_by_name():
    assert load_config("quickstart").name == "quickstart"


def test_null_removes_a_term_and_overrides_create_sections():
    cfg = load_config(QUICKSTART, ["loss.kd=null", "loss.at.student=layer*", "loss.at.teacher=layer*"])
    assert set(cfg.terms) == {"ce", "at"}


def test_shorthands():
    cfg = load_config(data={"student": "cnn_small", "teacher": "cnn_large", "logger": "none",
                            "train": {"optimizer": "adam", "scheduler": "constant"}})
    assert cfg.student.model == "cnn_small"
    assert cfg.teacher[0].model == "cnn_large"
    assert cfg.train.optimizer.name == "adam"
    cfg = load_config(data={"student": "cnn_small", "logger": "none"}, overrides=["logger.project=x"])
    assert cfg.logger.project == "x" and cfg.logger.name == "none"


def test_base_files_are_merged(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"student": "cnn_tiny", "seed": 3, "train": {"epochs": 7}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "train": {"grad_clip": 1.0}}))
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.train.epochs, cfg.train.grad_clip, cfg.student.model) == (3, 7, 1.0, "cnn_tiny")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


CHAIN = {"models": {"teacher": {"model": "cnn_tiny"}, "student": {"model": "cnn_tiny"}},
         "stages": [{"name": "teacher", "model": "teacher", "train": {"epochs": 4}},
                    {"name": "student", "model": "student", "teacher": "teacher",
                     "loss": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9}}, "train": {"epochs": 5}}]}


def test_a_derived_config_changes_removes_and_appends_stages_by_name(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(CHAIN))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "stages": {
        "student": {"train": {"epochs": 2}, "loss": {"kd": None}},
        "finetune": {"model": "student", "teacher": "teacher", "train": {"epochs": 1, "quantization_aware": True}}}}))
    cfg = load_config(tmp_path / "child.yaml")
    assert [s.name for s in cfg.stages] == ["teacher", "student", "finetune"]
    teacher, student, finetune = cfg.stages
    assert teacher.train.epochs == 4  # untouched
    assert (student.train.epochs, set(student.terms), student.teacher) == (2, {"ce"}, ["teacher"])
    assert finetune.train.quantization_aware and finetune.teacher == ["teacher"]
    (tmp_path / "drop.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "stages": {"student": None}}))
    assert [s.name for s in load_config(tmp_path / "drop.yaml").stages] == ["teacher"]


@pytest.mark.parametrize("stages,message", [
    ({"studnet": None}, r"stages: there is no entry named 'studnet' to remove; the names are 'teacher', 'student'"),
    ({"student": 3}, r"stages\.student: give a mapping of changes to that entry, or null to remove it"),
])
def test_bad_stage_changes_say_what_was_wrong(tmp_path, stages, message):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(CHAIN))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "stages": stages}))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "child.yaml")


@pytest.mark.parametrize("override,message", [
    ("trian.epochs=3", r"trian: unknown key\. Did you mean 'train'\?"),
    ("train.epoch=3", r"train\.epoch: unknown key\. Did you mean 'epochs'\?.*Allowed here: epochs, optimizer"),
    ("train.epochs=many", r"train\.epochs: Input should be a valid integer"),
    ("train.epochs=0", r"train\.epochs: Input should be greater than 0"),
    ("loss.kd.temprature=2", r"loss\.kd: unknown argument 'temprature'\. Did you mean 'temperature'\?"),
    ("loss.kd.temperature=hot", r"loss\.kd: argument 'temperature' got 'hot'"),
    ("loss.kdd.weight=1", r"loss\.kdd: unknown loss 'kdd'\. Did you mean 'kd'.*featkd list losses"),
    ("student.model=cnn_tin", r"student\.model: unknown model 'cnn_tin'\. Did you mean 'cnn_tiny'"),
    ("student.args.widht=3", r"student\.args \(cnn_tiny\): unknown argument 'widht'"),
    ("data.name=digit", r"data\.name: unknown dataset 'digit'\. Did you mean 'digits'"),
    ("data.args.augmnt=false", r"data\.args: unknown argument 'augmnt'\. Did you mean 'augment'"),
    ("train.optimizer.name=sgdd", r"train\.optimizer: unknown optimizer 'sgdd'"),
    ("train.optimizer.momentun=0.5", r"train\.optimizer: unknown argument 'momentun'"),
    ("train.scheduler.name=cosin", r"train\.scheduler: unknown scheduler 'cosin'"),
    ("logger.mode=cloud", r"logger\.mode: Input should be 'offline', 'online' or 'disabled'"),
    ("teacher=null", r"loss\.kd: 'kd' needs a teacher"),
    ("loss.at.weight=1", r"loss\.at: 'at' compares features; set loss\.at\.student"),
    ("loss.kd.adapter=magic", r"loss\.kd\.adapter: unknown adapter 'magic'"),
    ("device=tpu", r"device: 'tpu'"),
    ("teacher.foo=1", r"teacher\.0\.foo: unknown key.*Allowed here: model, args"),
])
def test_bad_values_give_one_clear_message_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, [override])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_missing_config_file_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="not found.*quickstart.yaml"):
        load_config("no/such/file.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("student: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_flatten_gives_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": []}) == {"a.b": 1, "a.c.d": 2, "e": []}


def test_a_saved_config_keeps_each_terms_adapter_choice():
    """The resolved config a run saves (and --smoke, compare and resume reload) must build the
    same adapters as the file it came from: the loss's default, none, or a named one."""
    from featkd.terms import terms_from

    config = load_config("zoo/ab.yaml", ["loss.hint_plain.type=fitnet", "loss.hint_plain.student=layer2",
                                         "loss.hint_plain.teacher=layer2", "loss.hint_plain.adapter=null",
                                         "loss.named.type=fitnet", "loss.named.student=layer3",
                                         "loss.named.teacher=layer3", "loss.named.adapter=conv"])
    reloaded = load_config(data=yaml.safe_load(yaml.safe_dump(config.to_dict())))
    for cfg in (config, reloaded):
        adapters = {t.name: t.adapter for t in terms_from(cfg.terms)}
        assert adapters == {"ce": None, "ab": "auto", "hint_plain": None, "named": "conv"}
