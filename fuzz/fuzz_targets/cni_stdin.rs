//! What the container runtime hands the CNI plugin: stdin JSON and the CNI_*
//! environment. Input: env lines `K=V`, a NUL byte, then stdin.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (env, stdin) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let vars: HashMap<String, String> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    if let Ok(env) = istio_cni::cni::Env::from_vars(|k| vars.get(k).cloned()) {
        let _ = env.pod();
    }
    if let Ok(conf) = istio_cni::cni::parse_conf(stdin) {
        if let Some(prev) = conf.prev_result.as_ref() {
            let _ = istio_cni::cni::prev_ips(prev);
            // The answer in the config's version: converting never panics.
            let _ = istio_cni::cni::result_for(prev, &conf.cni_version);
        }
    }
});
