//! `istio-cni`: the chained CNI plugin the container runtime runs for each pod.

use std::io::Read;
use std::process::ExitCode;

use istio_cni::cni::{code, CniError, Env};

fn main() -> ExitCode {
    let outcome = Env::from_vars(|k| std::env::var(k).ok()).and_then(|env| {
        let mut stdin = Vec::new();
        std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
            CniError::new(
                code::IO,
                "cannot read network config from stdin",
                e.to_string(),
            )
        })?;
        istio_cni::plugin::run(&env, &stdin)
    });
    match outcome {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("istio-cni: {e}");
            println!("{}", serde_json::to_string(&e).expect("error serializes"));
            ExitCode::FAILURE
        }
    }
}
