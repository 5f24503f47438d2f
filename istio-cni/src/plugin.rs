//! The chained CNI plugin: ask the node agent about the pod (it decides
//! membership from its live mesh state and enrols an ambient pod), pass the
//! earlier plugins' result through unchanged. The plugin never reads the
//! mesh; when the agent does not answer it judges from the agent's small
//! membership answer on disk (`crate::fallback`) and starts only pods that
//! are certainly outside the mesh.

use crate::api::{self, CallError, Op, Request, Verdict};
use crate::cni::{self, code, CniError, Command, Env, NetConf};
use crate::fallback::{self, Judged};

/// Runs one invocation; the Ok value is what goes to stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(cni::version_result()));
    }
    let conf = cni::parse_conf(stdin)?;
    let version = conf.cni_version.clone();
    run_conf(env, conf).map_err(|e| e.in_version(&version))
}

fn run_conf(env: &Env, conf: NetConf) -> Result<Option<String>, CniError> {
    // The answer to ADD: what the earlier plugins gave, in our config's version.
    let result = |prev: &serde_json::Value| -> Result<Option<String>, CniError> {
        Ok(Some(cni::result_for(prev, &conf.cni_version)?.to_string()))
    };
    match env.command {
        // Ready whenever we run: a pod the agent cannot take yet fails its
        // own ADD with "try again later", other pods start; saying "not
        // ready" here would stop every pod on the node.
        Command::Status => return Ok(None),
        // Nothing of ours outlives a netns: the agent forgets vanished
        // ones on its own.
        Command::Gc => return Ok(None),
        _ => {}
    }
    let prev = || {
        conf.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "istio-cni must be chained after the primary plugin (no prevResult)",
                format!("network {:?}", conf.name),
            )
        })
    };
    let Some((namespace, name)) = env.pod() else {
        // Not a Kubernetes pod (no K8S_POD_* args): nothing of ours.
        return match env.command {
            Command::Add => result(prev()?),
            _ => Ok(None),
        };
    };
    let req = |op: Op| Request {
        op,
        namespace: namespace.clone(),
        name: name.clone(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ips: conf
            .prev_result
            .as_ref()
            .map(cni::prev_ips)
            .unwrap_or_default(),
    };
    let pod = format!("{namespace}/{name}");
    match env.command {
        Command::Add => {
            // Converted before anything is done, so a result we could not
            // give fails the ADD with the pod untouched.
            let out = result(prev()?)?;
            let netns = env.netns.as_deref().expect("checked for ADD");
            if !netns.exists() {
                return Err(CniError::new(
                    code::UNKNOWN_CONTAINER,
                    format!("netns {} does not exist", netns.display()),
                    format!("container {}", env.container_id),
                ));
            }
            let add = req(Op::Add);
            match api::call(&conf.agent_socket, &add) {
                Ok(Verdict::Enrolled) => {}
                Ok(Verdict::Outside(why)) => log(&format!("{pod}: not captured ({why})")),
                Err(e) if e.is_refusal() => {
                    return Err(CniError::new(
                        code::ENROL_FAILED,
                        format!("pod {pod} is ambient but could not be enrolled"),
                        e.to_string(),
                    ))
                }
                Err(e) => without_agent(&conf, &namespace, &name, e, Some(&add))?,
            }
            Ok(out)
        }
        Command::Check => {
            prev()?;
            match api::call(&conf.agent_socket, &req(Op::Check)) {
                Ok(_) => {}
                Err(e) if e.is_refusal() => {
                    return Err(CniError::new(
                        code::ENROL_FAILED,
                        format!("pod {pod} is ambient but not captured as it should be"),
                        e.to_string(),
                    ))
                }
                Err(e) => without_agent(&conf, &namespace, &name, e, None)?,
            }
            Ok(None)
        }
        Command::Del => {
            // Never fails: the pod is going away whatever we say, and an
            // agent that is down reconciles the vanished netns on its own.
            if let Err(e) = api::call(&conf.agent_socket, &req(Op::Del)) {
                log(&format!(
                    "{pod}: DEL not delivered ({e}); the agent prunes it"
                ));
            }
            Ok(None)
        }
        Command::Version | Command::Status | Command::Gc => unreachable!("answered above"),
    }
}

/// The agent did not answer (down, restarting, stuck past the timeout):
/// a pod that may be ambient fails with "try again later", so it never
/// starts uncaptured; one that is certainly outside starts, and an ADD is
/// left for the agent to take in when it is back.
fn without_agent(
    conf: &NetConf,
    namespace: &str,
    name: &str,
    err: CallError,
    add: Option<&Request>,
) -> Result<(), CniError> {
    let answer = fallback::read(&conf.agent_state_dir);
    match fallback::judge(
        answer.as_ref().ok(),
        &conf.exclude_namespaces,
        namespace,
        name,
    ) {
        Judged::Outside(why) => {
            log(&format!(
                "{namespace}/{name}: not captured ({why}, from the node agent's last answer; {err})"
            ));
            if let Some(add) = add {
                if let Err(e) = fallback::leave_pending(&conf.agent_state_dir, add) {
                    log(&format!(
                        "{namespace}/{name}: cannot leave the pod for the agent ({e}); a later label captures it only after its next ADD"
                    ));
                }
            }
            Ok(())
        }
        Judged::MaybeAmbient(why) => {
            let mut details = err.to_string();
            if let Err(e) = &answer {
                details += &format!("; no membership answer: {e}");
            }
            Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "pod {namespace}/{name} may be ambient ({why}) and could not be enrolled: the node agent did not answer"
                ),
                details,
            ))
        }
    }
}

/// The runtime keeps stderr in its logs; stdout is the protocol.
fn log(msg: &str) {
    eprintln!("istio-cni: {msg}");
}
