use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::automation::{self, Action, Engine, Kind};
use super::*;

const NO_MX: [&str; 0] = [];

fn rules(text: &str) -> Rules {
    Rules::from_text(text, "/etc/shaping.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn refused(text: &str) -> String {
    Rules::from_text(text, "/etc/shaping.toml")
        .expect_err("refused")
        .to_string()
}

#[test]
fn the_built_in_rules_load_and_match_the_big_providers() {
    let r = Rules::defaults();
    assert!(r.automation.len() >= 5);
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "gmail-smtp-in.l.google.com",
                "alt1.gmail-smtp-in.l.google.com.",
            ],
            "google",
        ),
        (
            &["aspmx.l.google.com", "alt2.aspmx.l.googlemail.com"],
            "google",
        ),
        (&["mta5.am0.yahoodns.net", "mta6.am0.yahoodns.net"], "yahoo"),
        (&["hotmail-com.olc.protection.outlook.com"], "outlook"),
        (&["contoso-com.mail.protection.outlook.com"], "office365"),
        (&["MX01.mail.icloud.com", "mx02.mail.icloud.com"], "apple"),
        (&["eu-smtp-inbound-1.mimecast.com"], "mimecast"),
    ];
    for (mx, site) in cases {
        let a = r.resolve("customer.example", mx, None);
        assert_eq!(a.site, site, "{mx:?}");
        assert!(a.origins[1]
            .as_deref()
            .is_some_and(|o| o.contains("built-in")));
    }
    let g = r.resolve("gmail.com", &["gmail-smtp-in.l.google.com"], None);
    assert_eq!(g.limits.max_connections, Some(5));
    assert_eq!(g.limits.max_messages_per_connection, Some(50));
    assert_eq!(g.matched, Some(("google".into(), "*.google.com".into())));
    // A set with one host elsewhere is not Google's: the site is the MX set, nothing set.
    let mixed = r.resolve(
        "Mixed.Example.",
        &["mx.backup.example", "aspmx.l.google.com"],
        None,
    );
    assert_eq!(mixed.site, "aspmx.l.google.com,mx.backup.example");
    assert_eq!(mixed.limits, Limits::default());
    // No MX known: the domain is the site; a domain entry applies.
    let c = r.resolve("COMCAST.net", &NO_MX, None);
    assert_eq!(c.site, "comcast.net");
    assert_eq!(c.limits.max_connections, Some(25));
    // A suffix does not match the bare name, nor a longer label.
    assert_eq!(r.resolve("x", &["google.com"], None).site, "google.com");
    assert_eq!(
        r.resolve("x", &["evilgoogle.com"], None).site,
        "evilgoogle.com"
    );
}

#[test]
fn precedence_site_then_domain_then_source_and_file_over_built_in() {
    let r = rules(
        r#"
[site.google]
max_connections = 2
max_message_rate = "10/s"
[site.google.sources.ip1]
max_connections = 1

[site.bulkmx]
match = ["*.bulk.example"]
max_recipients_per_transaction = 10

[domain."gmail.com"]
max_message_rate = "5/s"
retry_interval = "10m"
[domain."gmail.com".sources.ip1]
max_message_rate = "1/s"
"#,
    );
    let mx = ["gmail-smtp-in.l.google.com"];
    let a = r.resolve("gmail.com", &mx, None);
    assert_eq!(a.site, "google");
    assert_eq!(a.limits.max_connections, Some(2), "file over built-in");
    assert_eq!(
        a.limits.max_messages_per_connection,
        Some(50),
        "built-in kept where the file says nothing"
    );
    assert_eq!(
        a.limits.max_message_rate.as_ref().map(|r| r.per_second()),
        Some(5.0)
    );
    assert_eq!(
        a.origins[2].as_deref(),
        Some("domain gmail.com (/etc/shaping.toml)"),
        "domain over site"
    );
    assert_eq!(a.limits.retry_interval, Some(Duration::from_secs(600)));
    let s = r.resolve("gmail.com", &mx, Some("ip1"));
    assert_eq!(s.limits.max_connections, Some(1), "source over general");
    assert_eq!(
        s.limits.max_message_rate.as_ref().map(|r| r.per_second()),
        Some(1.0)
    );
    assert_eq!(
        s.origins[0].as_deref(),
        Some("site google source ip1 (/etc/shaping.toml)")
    );
    // Another Google domain: the site's values, not gmail.com's.
    let w = r.resolve("workspace.example", &["aspmx.l.google.com"], Some("ip2"));
    assert_eq!(
        w.limits.max_message_rate.as_ref().map(|r| r.per_second()),
        Some(10.0)
    );
    assert_eq!(w.limits.max_connections, Some(2));
    // The file's own provider.
    let b = r.resolve("b.example", &["mx1.bulk.example"], None);
    assert_eq!(b.site, "bulkmx");
    assert_eq!(b.limits.max_recipients_per_transaction, Some(10));
    // A site named by its MX set.
    let r2 = rules("[site.\"mx1.a.example,mx2.a.example\"]\nmax_connections = 3\n");
    let m = r2.resolve("a.example", &["MX2.a.example.", "mx1.a.example"], None);
    assert_eq!(m.site, "mx1.a.example,mx2.a.example");
    assert_eq!(m.limits.max_connections, Some(3));
    // explain names each value's rule and what is not set.
    let lines = r.explain("gmail.com", &mx, Some("ip1")).join("\n");
    assert!(
        lines.contains("site google: every MX host matches *.google.com of site google"),
        "{lines}"
    );
    assert!(
        lines.contains("max_connections = 1  (set by site google source ip1 (/etc/shaping.toml))"),
        "{lines}"
    );
    assert!(lines.contains("max_connection_rate: not set"), "{lines}");
    assert!(lines.contains("automation gmail-4.7.28"), "{lines}");
}

#[test]
fn replace_defaults_drops_the_built_in_rules() {
    let r = rules("replace_defaults = true\n[domain.\"x.example\"]\nmax_connections = 4\n");
    let a = r.resolve("gmail.com", &["gmail-smtp-in.l.google.com"], None);
    assert_eq!(a.site, "gmail-smtp-in.l.google.com");
    assert_eq!(a.limits, Limits::default());
    assert!(r.automation.is_empty());
}

#[test]
fn bad_files_are_refused_naming_the_file_and_the_entry() {
    let e = refused("[site.google]\nmax_conections = 3\n");
    assert!(
        e.contains("/etc/shaping.toml") && e.contains("max_conections"),
        "{e}"
    );
    let e = refused("[domain.\"a.example\"]\nmax_message_rate = \"10/x\"\n");
    assert!(
        e.contains("/etc/shaping.toml: domain \"a.example\": max_message_rate"),
        "{e}"
    );
    let e = refused("[site.s]\nmax_connections = 0\n");
    assert!(
        e.contains("site \"s\": max_connections: must be at least 1"),
        "{e}"
    );
    let e = refused("[site.s]\nmatch = [\"*google.com\"]\n");
    assert!(e.contains("site \"s\": match"), "{e}");
    let e = refused("[domain.\"d.example\".sources.ip1]\nmax_connections = -1\n");
    assert!(e.contains("/etc/shaping.toml"), "{e}");
    let e = refused("[domain.\"d.example\".sources.ip1]\nretry_interval = \"5x\"\n");
    assert!(e.contains("unknown time unit"), "{e}");
    let e = refused("[site.s]\nretry_interval = \"2h\"\nmax_retry_interval = \"1h\"\n");
    assert!(e.contains("retry_interval is longer"), "{e}");
    let e = refused(
        "[[automation]]\nname = \"r\"\ntext = \"x\"\naction = \"lower\"\nduration = \"1h\"\n",
    );
    assert!(
        e.contains("/etc/shaping.toml: automation \"r\": action \"lower\" needs"),
        "{e}"
    );
    let e = refused("[[automation]]\nname = \"r\"\naction = \"suspend\"\nduration = \"1h\"\n");
    assert!(
        e.contains("at least one of code, status, text, class"),
        "{e}"
    );
    let e = refused(
        "[[automation]]\nname = \"r\"\ntext = \"x\"\naction = \"pause\"\nduration = \"1h\"\n",
    );
    assert!(e.contains("pause"), "{e}");
    let e = refused(
        "[[automation]]\nname = \"r\"\ncode = \"6xx\"\naction = \"suspend\"\nduration = \"1h\"\n",
    );
    assert!(e.contains("automation \"r\": code"), "{e}");
    let e = refused(
        "[[automation]]\nname = \"r\"\ntext = \"(\"\naction = \"suspend\"\nduration = \"1h\"\n",
    );
    assert!(e.contains("automation \"r\": text"), "{e}");
    let e = refused("[[automation]]\nname = \"r\"\ntext = \"x\"\naction = \"suspend\"\nduration = \"1h\"\n[[automation]]\nname = \"r\"\ntext = \"y\"\naction = \"suspend\"\nduration = \"1h\"\n");
    assert!(e.contains("a second rule of this name"), "{e}");
    let e = refused("[[automation]]\nname = \"r\"\ntext = \"x\"\naction = \"suspend\"\nduration = \"1h\"\ncolour = 1\n");
    assert!(e.contains("colour"), "{e}");
    // A missing file names its path.
    let e = Rules::load(Some(Path::new("/nonexistent/shaping.toml")))
        .expect_err("missing")
        .to_string();
    assert!(e.starts_with("/nonexistent/shaping.toml: "), "{e}");
    assert!(Rules::load(None).is_ok());
}

#[test]
fn the_cache_answers_without_asking_the_rules_again() {
    let s = Shaping::new(Arc::new(Rules::defaults()));
    let a = s.lookup(
        "gmail.com",
        &[
            "alt1.gmail-smtp-in.l.google.com",
            "gmail-smtp-in.l.google.com",
        ],
        None,
    );
    let b = s.lookup(
        "GMAIL.com.",
        &[
            "Gmail-Smtp-In.l.google.com.",
            "alt1.gmail-smtp-in.l.google.com",
        ],
        None,
    );
    assert!(
        Rc::ptr_eq(&a, &b),
        "another order and case of the same MX set is a hit"
    );
    assert_eq!(s.cached(), 1);
    let c = s.lookup("gmail.com", &["gmail-smtp-in.l.google.com"], None);
    assert!(!Rc::ptr_eq(&a, &c), "another MX set is another key");
    let d = s.lookup("gmail.com", &["gmail-smtp-in.l.google.com"], Some("ip1"));
    assert!(!Rc::ptr_eq(&c, &d));
    assert_eq!(s.cached(), 3);
    // New rules: the cache starts afresh and the new values apply.
    s.replace(Arc::new(rules("[site.google]\nmax_connections = 1\n")));
    assert_eq!(s.cached(), 0);
    let e = s.lookup("gmail.com", &["gmail-smtp-in.l.google.com"], None);
    assert_eq!(e.limits.max_connections, Some(1));
    // Bounded.
    for i in 0..CACHE_MAX + 10 {
        s.lookup(&format!("d{i}.example"), &NO_MX, None);
    }
    assert!(s.cached() <= CACHE_MAX);
}

const TSS04: &str = "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes";

fn engine(text: &str) -> Engine {
    Engine::new(0, Arc::new(rules(text)))
}

#[test]
fn the_default_rules_act_on_the_providers_throttle_replies() {
    let e = Engine::new(0, Arc::new(Rules::defaults()));
    let t = 1_000_000;
    // Elsewhere, the Yahoo rule does not watch: the generic throttle rule lowers the site.
    let o = e.observe("other.example", None, TSS04, t);
    assert_eq!(
        (o[0].action, o[0].rule.as_str()),
        (Kind::Lower, "generic-throttle")
    );
    let a = e.observe("yahoo", None, TSS04, t);
    assert_eq!(a.len(), 1);
    assert_eq!(
        (a[0].action, a[0].rule.as_str()),
        (Kind::Suspend, "yahoo-tss04")
    );
    assert_eq!(a[0].until_unix_ms, t + 2 * 3600 * 1000);
    let held = e.effect("yahoo", None, t + 1).suspended.expect("suspended");
    assert!(
        held.starts_with("4.4.5 shaping: site yahoo suspended until ")
            && held.contains("yahoo-tss04"),
        "{held}"
    );
    let g = e.observe("google", None, "421-4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from your IP address.", t);
    assert_eq!(g[0].rule, "gmail-4.7.28");
    let eff = e.effect("google", None, t + 1);
    assert_eq!((eff.max_connections, eff.suspended), (Some(1), None));
    assert!((eff.max_message_rate.unwrap() - 1.0 / 60.0).abs() < 1e-9);
    let m = e.observe("office365", None, "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.", t);
    assert_eq!(
        m.iter().map(|a| a.rule.as_str()).collect::<Vec<_>>(),
        ["microsoft-4.7.650"],
        "the first rule that matches"
    );
    let s = e.observe("outlook", None, "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", t);
    assert_eq!(s[0].rule, "microsoft-S3150");
    // Gmail 450 4.2.1: ten within ten minutes.
    let busy = "450-4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered.";
    for i in 0..9 {
        assert!(e.observe("google", None, busy, t + i).is_empty());
    }
    assert_eq!(
        e.observe("google", None, busy, t + 9)[0].rule,
        "gmail-4.2.1"
    );
    // Our own diagnostics (no reply code) never count.
    assert!(e
        .observe("yahoo", None, "4.4.1 [TSS04] connection refused", t)
        .is_empty());
}

#[test]
fn n_events_within_t_trigger_and_older_ones_do_not_count() {
    let e = engine("replace_defaults = true\n[[automation]]\nname = \"r\"\ncode = \"4xx\"\ntext = \"slow down\"\ncount = 3\nwithin = \"60s\"\naction = \"suspend\"\nduration = \"10m\"\nper_source = true\n");
    let t = 5_000_000;
    let slow = "452 4.3.2 slow down please";
    assert!(e.observe("s", Some("ip1"), slow, t).is_empty());
    assert!(e
        .observe("s", Some("ip1"), "550 5.1.1 no such user", t)
        .is_empty());
    assert!(e.observe("s", Some("ip1"), slow, t + 30_000).is_empty());
    // The first is more than 60 s old by now: two in the window.
    assert!(e.observe("s", Some("ip1"), slow, t + 61_000).is_empty());
    // Another source has its own count.
    assert!(e.observe("s", Some("ip2"), slow, t + 62_000).is_empty());
    let a = e.observe("s", Some("ip1"), slow, t + 62_000);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].source.as_deref(), Some("ip1"));
    assert!(e.effect("s", Some("ip1"), t + 62_001).suspended.is_some());
    assert!(
        e.effect("s", Some("ip2"), t + 62_001).suspended.is_none(),
        "site x source"
    );
    assert!(
        e.effect("s", Some("ip1"), t + 62_000 + 600_000)
            .suspended
            .is_none(),
        "over after its duration"
    );
    // Three more within the window while it runs: the same action, extended.
    for i in 0..3 {
        e.observe("s", Some("ip1"), slow, t + 100_000 + i);
    }
    assert_eq!(e.active_count(), 1);
    assert_eq!(e.actions()[0].until_unix_ms, t + 100_002 + 600_000);
}

#[test]
fn a_lowered_site_is_restored_in_steps_then_the_action_ends() {
    let e = engine("[[automation]]\nname = \"low\"\nstatus = \"4.7.1\"\naction = \"lower\"\nmax_connections = 1\nmax_message_rate = \"1/s\"\nduration = \"10s\"\nrestore_steps = 2\nrestore_step = \"5s\"\n");
    let t = 10_000_000;
    let a = e.observe("site", None, "421 4.7.1 try later", t);
    assert_eq!(a[0].end_unix_ms(), t + 20_000);
    let at = |dt: u64| {
        let x = e.effect("site", None, t + dt);
        (x.max_connections, x.max_message_rate)
    };
    assert_eq!(at(1_000), (Some(1), Some(1.0)));
    assert_eq!(at(9_999), (Some(1), Some(1.0)));
    assert_eq!(at(10_000), (Some(2), Some(2.0)), "step 1");
    assert_eq!(at(15_000), (Some(4), Some(4.0)), "step 2");
    assert_eq!(at(20_000), (None, None), "ended");
    assert_eq!(e.actions()[0].state(t + 12_000), "restoring 1/2");
    assert_eq!(e.expire(t + 19_999), 0);
    assert_eq!(e.expire(t + 20_000), 1);
    assert_eq!(e.active_count(), 0);
    // A suspension with restore steps restores from one connection.
    let s = engine("[[automation]]\nname = \"sus\"\ntext = \"x\"\naction = \"suspend\"\nduration = \"10s\"\nrestore_steps = 1\nrestore_step = \"10s\"\n");
    s.observe("site", None, "421 x", t);
    assert!(s.effect("site", None, t + 5_000).suspended.is_some());
    let r = s.effect("site", None, t + 10_000);
    assert_eq!((r.suspended, r.max_connections), (None, Some(2)));
}

#[test]
fn cancel_ends_an_action() {
    let e = engine("");
    let t = 20_000_000;
    let id = e.observe("yahoo", None, TSS04, t)[0].id.clone();
    assert!(e.cancel("nope").is_none());
    assert_eq!(
        e.cancel(&id).map(|a| a.rule),
        Some("yahoo-tss04".to_string())
    );
    assert!(e.effect("yahoo", None, t + 1).suspended.is_none());
    assert_eq!(e.active_count(), 0);
}

fn action(id: &str, site: &str, since: u64, until: u64) -> Action {
    Action {
        id: id.into(),
        site: site.into(),
        source: None,
        rule: "yahoo-tss04".into(),
        action: Kind::Suspend,
        since_unix_ms: since,
        until_unix_ms: until,
        restore_steps: 0,
        restore_step_ms: 0,
        max_connections: None,
        max_message_rate: None,
        reply: TSS04.into(),
    }
}

#[test]
fn actions_persist_and_come_back_without_the_ended_ones() {
    let dir = tempfile::tempdir().unwrap();
    let spool = crate::spool::Dir::open_root(&dir.path().join("spool")).unwrap();
    let e = engine("");
    let now = automation::now_ms();
    e.observe("yahoo", None, TSS04, now);
    let bytes = e.render();
    let back = automation::parse(&bytes).unwrap();
    assert_eq!(back, e.actions());
    spool
        .replace_file(&automation::file_name(0), &bytes, true)
        .unwrap();
    // Shard 3 of a former run of 4 shards: now 2 shards, so shard 1's; one of its actions has ended.
    let old = [
        action("a", "x", now - 10_000, now + 60_000),
        action("b", "y", now - 10_000, now - 1),
    ];
    spool
        .replace_file(&automation::file_name(3), &automation::render(&old), true)
        .unwrap();
    let zero = automation::read_for_shard(&spool, 0, 2, now).unwrap();
    assert_eq!(zero, back);
    let one = automation::read_for_shard(&spool, 1, 2, now).unwrap();
    assert_eq!(one.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a"]);
    // The former shard's file went into shard 1's.
    let names = spool.names().unwrap();
    assert!(
        names.contains(&automation::file_name(1)) && !names.contains(&automation::file_name(3)),
        "{names:?}"
    );
    let restored = Engine::new(1, Arc::new(Rules::defaults()));
    restored.adopt(one);
    assert!(restored.effect("x", None, now).suspended.is_some());
    // What a stopped server's `shaping status` reads.
    let all = automation::read_all(&dir.path().join("spool"), now).unwrap();
    assert_eq!(all.len(), 2);
    // A broken file is an error naming it.
    spool
        .replace_file(&automation::file_name(0), b"{", true)
        .unwrap();
    let err = automation::read_for_shard(&spool, 0, 2, now).expect_err("broken");
    assert!(err.contains("shaping-actions.0.json"), "{err}");
}

/// `persist` writes the actions file on the blocking pool after a change (once per change), and again after a
/// cancel.
#[test]
fn persist_writes_the_file_after_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let spool = Arc::new(crate::spool::Dir::open_root(&root).unwrap());
    glommio::LocalExecutor::default().run(async move {
        let e = engine("");
        e.set_store(2, spool);
        let now = automation::now_ms();
        let id = e.observe("yahoo", None, TSS04, now)[0].id.clone();
        e.persist();
        assert!(e.dirty(), "a write in flight");
        for _ in 0..100 {
            if !e.dirty() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        let path = root.join(automation::file_name(2));
        let on_disk = automation::parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(on_disk, e.actions());
        assert_eq!(on_disk[0].id, id);
        e.cancel(&id);
        e.persist();
        for _ in 0..100 {
            if !e.dirty() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        assert!(automation::parse(&std::fs::read(&path).unwrap())
            .unwrap()
            .is_empty());
    });
}

/// An actions file is read back as hostile input: a valid action is taken, one outside the rules' bounds (no
/// connection, no rate, an end years away, too many steps) is refused, so a hand-edited file cannot stop a site
/// for good.
#[test]
fn actions_read_back_outside_the_rules_bounds_are_refused() {
    let action = |extra: &str| {
        format!(
            "{{\"version\":1,\"actions\":[{{\"id\":\"a1\",\"site\":\"yahoo\",\"source\":null,\"rule\":\"r\",\"action\":\"lower\",\"since_unix_ms\":1000,\"until_unix_ms\":61000,\"restore_steps\":2,\"restore_step_ms\":1000,\"max_connections\":1,\"max_message_rate\":0.5,\"reply\":\"421 x\"{extra}}}]}}"
        )
    };
    let ok = automation::parse(action("").as_bytes()).expect("valid");
    assert_eq!(ok.len(), 1);
    for (bad, what) in [
        (",\"max_connections\":0", "max_connections 0"),
        (",\"max_message_rate\":0.0", "below one a day"),
        (",\"until_unix_ms\":18446744073709551615", "longest"),
        (",\"restore_steps\":1000", "restore steps"),
    ] {
        // The variant: the key's value replaced (JSON objects with a repeated key are refused).
        let key = &bad[2..bad[2..].find('"').unwrap() + 2];
        let text = action("");
        let start = text.find(&format!("\"{key}\":")).unwrap();
        let end = start + text[start..].find([',', '}']).unwrap();
        let text = format!("{}{}{}", &text[..start], &bad[1..], &text[end..]);
        let err = automation::parse(text.as_bytes()).expect_err(what);
        assert!(err.contains(what), "{err}");
    }
}
