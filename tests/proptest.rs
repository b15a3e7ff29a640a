//! Property tests (the fuzzing of CI): the KKMTransfer codec, `.$n` names and the config
//! parser never panic on arbitrary input, and what the bridge writes reads back exactly.
//! Seeds include the vendor fixtures and the bundled example configs.
//! `PROPTEST_CASES` overrides the number of cases (default 2,000 per property).

use std::path::Path;

use kkm_bridge::config::Config;
use kkm_bridge::package::{
    decode_base64, decode_package_data, encode_plain_base64, encode_zip_base64, unzip_if_zipped,
    wrap_base64_crlf, NamePattern,
};
use proptest::prelude::*;

#[path = "support/props.rs"]
mod props;
use props::{fixtures, mutate};

fn example_configs() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "toml")
                .then(|| std::fs::read_to_string(p).ok())
                .flatten()
        })
        .collect();
    v.sort();
    assert!(v.len() >= 3);
    v
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)
}

proptest! {
    #![proptest_config(props::config(2000))]

    #[test]
    fn zip_base64_round_trips_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let text = encode_zip_base64(&bytes, "x.txt");
        prop_assert_eq!(decode_package_data(text.as_bytes(), 1 << 20).unwrap(), bytes);
    }

    #[test]
    fn plain_base64_round_trips_wrapped_or_not(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let plain = encode_plain_base64(&bytes);
        prop_assert_eq!(decode_base64(plain.as_bytes()).unwrap(), bytes.clone());
        let wrapped = wrap_base64_crlf(&plain);
        prop_assert_eq!(decode_base64(wrapped.as_bytes()).unwrap(), bytes.clone());
        // Not a ZIP: passes through unzip unchanged (unless it happens to start like one).
        if !bytes.starts_with(b"PK") {
            prop_assert_eq!(decode_package_data(wrapped.as_bytes(), 1 << 20).unwrap(), bytes);
        }
    }

    #[test]
    fn decode_never_panics_on_arbitrary_input(text in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_package_data(&text, 1 << 16);
        let _ = unzip_if_zipped(text, 1 << 16);
    }

    #[test]
    fn decode_never_panics_on_mutated_fixtures(which in any::<prop::sample::Index>(), e in edits()) {
        let fx = fixtures();
        let seed = fx[which.index(fx.len())].clone();
        // The fixture itself, its ZIP+base64 wrapping, and its base64: each mutated.
        let wrapped = encode_zip_base64(&seed, "f.txt").into_bytes();
        let zipped = kkm_bridge::package::zip_one(&seed, "f.txt");
        for input in [seed.clone(), wrapped, encode_plain_base64(&zipped).into_bytes()] {
            let m = mutate(input, &e);
            let _ = decode_package_data(&m, 1 << 16);
        }
        let m = mutate(zipped, &e);
        if let Ok(out) = unzip_if_zipped(m, 1 << 16) {
            prop_assert!(out.len() <= 1 << 16);
        }
    }

    #[test]
    fn name_parse_inverts_render(
        prefix in "[A-Za-z_][A-Za-z0-9_ .-]{0,8}",
        suffix in "([.A-Za-z_-][A-Za-z0-9_.-]{0,8})?",
        pos in any::<u32>(),
        n in 1u32..,
    ) {
        let pattern = format!("{prefix}{{pos}}{suffix}");
        prop_assume!(!pattern.starts_with('.') && !pattern.contains(".."));
        let p = NamePattern::new(&pattern).unwrap();
        let numbered = p.render(pos, Some(n));
        let parsed = p.parse(&numbered, true).unwrap();
        prop_assert_eq!((parsed.pos, parsed.n), (pos, Some(n)));
        prop_assert_eq!(p.parse(&numbered, false), None);
        let single = p.render(pos, None);
        let parsed = p.parse(&single, false).unwrap();
        prop_assert_eq!((parsed.pos, parsed.n), (pos, None));
        prop_assert!(!numbered.contains(['/', '\\', '\0']));
    }

    #[test]
    fn name_parse_never_panics_and_parsed_names_render_back(name in any::<String>(), pattern in any::<String>()) {
        let p = NamePattern::new("POS{pos}.spr").unwrap();
        for numbered in [true, false] {
            if let Some(parsed) = p.parse(&name, numbered) {
                // Only canonical names parse: render(parse(name)) == name.
                prop_assert_eq!(p.render(parsed.pos, parsed.n), name.clone());
            }
        }
        if let Ok(q) = NamePattern::new(&pattern) {
            let _ = q.parse(&name, true);
            prop_assert!(!q.render(1, Some(1)).contains(['/', '\\', '\0']));
        }
    }

    #[test]
    fn config_parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = Config::parse(&text, Path::new("fuzz.toml"));
    }

    #[test]
    fn config_parse_never_panics_on_mutated_examples(which in any::<prop::sample::Index>(), e in edits()) {
        let ex = example_configs();
        let seed = ex[which.index(ex.len())].clone().into_bytes();
        let m = mutate(seed, &e);
        let text = String::from_utf8_lossy(&m);
        let _ = Config::parse(&text, Path::new("fuzz.toml"));
    }

    #[test]
    fn config_parse_never_panics_on_odd_values(
        key in prop::sample::select(vec!["settle", "rescan", "retention", "max_body", "body_timeout", "pos", "spr", "listen", "timeout", "poll", "url", "connections"]),
        value in prop::sample::select(vec![
            "\"\"", "\"-1s\"", "\"99999999999999999999d\"", "\"1e400s\"", "\"0\"", "\"18446744073709551616B\"",
            "\"1-4294967295\"", "\"4294967295-1\"", "\"1,,2\"", "\"../x{pos}\"", "\"{pos}{pos}\"",
            "-1", "1.5", "true", "[]", "{}", "\"ftp://@:99999/\"", "\"ftp://a:b@[::1\"", "\"999.1.1.1:1\"",
        ]),
    ) {
        for seed in example_configs() {
            // Put the odd value under the key in every table that has it.
            let text: String = seed
                .lines()
                .map(|l| {
                    if l.trim_start().starts_with(&format!("{key} ")) || l.trim_start().starts_with(&format!("{key}=")) {
                        format!("{key} = {value}")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let _ = Config::parse(&text, Path::new("fuzz.toml"));
        }
    }
}
