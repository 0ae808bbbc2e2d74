use super::*;
use pcisim_journal::{Event, Record, ResetKind};
use std::fs;

const GOOD: &str = r#"
id = "T1"
name = "flr"
profile = "gpu-nsr"

[[step]]
name = "reset"
guest = "reset"
device = "gpu0"
args = ["--bdf", "{bdf:gpu0}", "--method", "flr"]
  [[step.count]]
  device = "gpu0"
  record = "reset_begin"
  where = { kind = "flr" }
  count = 1

[[step]]
sh = "cat /proc/version"
stdout = "Linux"

[expect]
violations = [{ device = "gpu0", kind = "dma_during_reset" }]
kernel = ["hung_task"]
count = [{ device = "gpu0", record = "client_connected", min = 0 }]
"#;

fn p(text: &str) -> Result<ScenarioFile, FileError> {
    parse(Path::new("t.toml"), text)
}

#[test]
fn test_a_good_file_parses_into_typed_steps_and_expectations() {
    let f = p(GOOD).unwrap();
    assert_eq!(f.name, "T1 flr");
    assert_eq!(f.profile, ProfileId::GpuNsr);
    assert_eq!(f.steps.len(), 2);
    assert_eq!(f.steps[0].line, 6);
    assert!(matches!(
        &f.steps[0].action,
        Action::Guest { program: GuestProgram::Reset, device, .. } if device == "gpu0"
    ));
    assert_eq!(
        f.steps[0].counts[0].describe(),
        "gpu0: 1 reset_begin{kind=flr}"
    );
    assert!(
        matches!(&f.steps[1].action, Action::Sh { exit: 0, stdout: Some(s), .. } if s == "Linux")
    );
    assert_eq!(
        f.violations,
        vec![("gpu0".to_string(), ViolationKind::DmaDuringReset)]
    );
    assert_eq!(f.kernel, vec![KernelReport::HungTask]);
    assert_eq!(f.counts[0].max, u64::MAX);
}

fn err(text: &str) -> String {
    p(text).unwrap_err().to_string()
}

#[test]
fn test_a_misspelt_violation_kind_is_refused_naming_the_line() {
    let bad = GOOD.replace("dma_during_reset", "dma_durring_reset");
    let e = err(&bad);
    assert!(e.contains("line 22"), "{e}");
    assert!(
        e.contains("dma_durring_reset") && e.contains("dma_during_reset"),
        "{e}"
    );
}

#[test]
fn test_bad_names_are_refused_with_their_line() {
    let e = err(&GOOD.replace("\"hung_task\"", "\"hungtask\""));
    assert!(
        e.starts_with("t.toml:21: unknown kernel report kind \"hungtask\""),
        "{e}"
    );
    let e = err(&GOOD.replace("record = \"reset_begin\"", "record = \"reset_start\""));
    assert!(
        e.starts_with("t.toml:6: unknown journal record type \"reset_start\""),
        "{e}"
    );
    let e = err(&GOOD.replace("guest = \"reset\"", "guest = \"rest\""));
    assert!(
        e.starts_with("t.toml:6: unknown guest program \"rest\""),
        "{e}"
    );
    // The guest program's options are its typed ones: a misspelt option, a value it does not
    // take and a missing required one are refused at load, naming the step's line.
    let e = err(&GOOD.replace("\"--method\", \"flr\"", "\"--methd\", \"flr\""));
    assert!(
        e.starts_with("t.toml:6: reset: unknown option --methd (it takes: --bdf --method"),
        "{e}"
    );
    let e = err(&GOOD.replace("\"--method\", \"flr\"", "\"--method\", \"flx\""));
    assert!(
        e.starts_with("t.toml:6: reset: --method: \"flx\" is not one of flr,"),
        "{e}"
    );
    let e = err(&GOOD.replace(", \"--method\", \"flr\"", ""));
    assert!(
        e.starts_with("t.toml:6: reset: missing required option --method"),
        "{e}"
    );
    let e = err(&GOOD.replace("gpu-nsr", "gpu-nrs"));
    assert!(
        e.starts_with("t.toml:4: unknown profile \"gpu-nrs\""),
        "{e}"
    );
    let e = err(&GOOD.replace("sh = \"cat /proc/version\"", "sh = \"x\"\nplug = \"gpu1\""));
    assert!(
        e.starts_with("t.toml:17: a step has one action, this one has sh and plug"),
        "{e}"
    );
    let e = err(&GOOD.replace("stdout = \"Linux\"", "stdot = \"Linux\""));
    assert!(
        e.contains("line 19") && e.contains("unknown field `stdot`"),
        "{e}"
    );
    let e = err(&GOOD.replace("count = 1", "count = 1\n  min = 2"));
    assert!(e.contains("count excludes min and max"), "{e}");
}

#[test]
fn test_record_types_come_from_the_journal_event_type() {
    assert!(check_record_type("reset_begin").is_ok());
    assert!(check_record_type("client_connected").is_ok());
    assert!(check_record_type("violation").is_ok());
    assert!(check_record_type("reset_begn").is_err());
}

#[test]
fn test_count_matching_filters_by_type_and_fields() {
    let rec = |event| Record {
        seq: 1,
        t_ns: 0,
        event,
    };
    let records = vec![
        rec(Event::ResetBegin {
            kind: ResetKind::Flr,
        }),
        rec(Event::ResetEnd {
            kind: ResetKind::Flr,
        }),
        rec(Event::ResetBegin {
            kind: ResetKind::DeviceReset,
        }),
    ];
    let f = p(GOOD).unwrap();
    let c = &f.steps[0].counts[0];
    assert_eq!(run::count_matching(c, &records), (1, None));
    let mut typo = c.clone();
    typo.fields = [("knd".to_string(), serde_json::json!("flr"))].into();
    assert_eq!(
        run::count_matching(&typo, &records),
        (0, Some("knd".into()))
    );
}

#[test]
fn test_every_profile_is_reachable_by_its_name() {
    for id in ProfileId::SUITE.iter().chain([&ProfileId::GpuLarge]) {
        assert_eq!(profile_by_name(&id.profile().name), Ok(*id));
    }
    assert!(profile_by_name("gpu-nrs").unwrap_err().contains("gpu-nsr"));
}

#[test]
fn test_a_device_the_profile_does_not_have_is_refused() {
    let e = err(&GOOD.replace("device = \"gpu0\"\nargs", "device = \"gpu9\"\nargs"));
    assert!(
        e.starts_with(
            "t.toml:6: no device \"gpu9\" in profile \"gpu-nsr\": its devices are gpu0, gpu1"
        ),
        "{e}"
    );
    let e = err(&GOOD.replace("{ device = \"gpu0\", kind", "{ device = \"gpu7\", kind"));
    assert!(e.starts_with("t.toml:21: no device \"gpu7\""), "{e}");
}

/// The repository's scenario files load (the lab_files test runs them in a VM).
#[test]
fn test_the_repository_scenario_files_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let files = expand(&[dir]).unwrap();
    let ids: Vec<String> = files
        .iter()
        .map(|f| parse(f, &fs::read_to_string(f).unwrap()).unwrap().id)
        .collect();
    assert_eq!(ids, ["F-E2", "F-H1", "F-H2", "F-R1", "F-R4"]);
}
