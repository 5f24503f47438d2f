//! The chained CNI plugin: decide membership, ask the node agent to enrol,
//! pass the earlier plugins' result through unchanged.

use crate::api::{self, Op, Request};
use crate::cni::{self, code, CniError, Command, Env, NetConf};
use crate::membership::{decide, Membership};

/// Runs one invocation; the Ok value is what goes to stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(cni::version_result()));
    }
    let conf = cni::parse_conf(stdin)?;
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
            Command::Add => Ok(Some(prev()?.to_string())),
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
    match env.command {
        Command::Add => {
            let prev = prev()?;
            match membership(&conf, &namespace, &name)? {
                Membership::Outside(why) => {
                    log(&format!("{namespace}/{name}: not captured ({why})"));
                    // Best effort: lets a later namespace label capture it.
                    let _ = api::call(&conf.agent_socket, &req(Op::Observe));
                }
                Membership::Undeclared => {
                    return Err(CniError::new(
                        code::ENROL_FAILED,
                        format!("pod {namespace}/{name} is in an ambient namespace but not in the mesh config"),
                        "declare the Pod (with its podIP and serviceAccountName) so it gets a mesh identity",
                    ))
                }
                Membership::Ambient { .. } => {
                    let netns = env.netns.as_deref().expect("checked for ADD");
                    if !netns.exists() {
                        return Err(CniError::new(
                            code::UNKNOWN_CONTAINER,
                            format!("netns {} does not exist", netns.display()),
                            format!("container {}", env.container_id),
                        ));
                    }
                    api::call(&conf.agent_socket, &req(Op::Add)).map_err(|e| enrol_error(&namespace, &name, e))?;
                }
            }
            Ok(Some(prev.to_string()))
        }
        Command::Check => {
            prev()?;
            if let Membership::Ambient { .. } = membership(&conf, &namespace, &name)? {
                api::call(&conf.agent_socket, &req(Op::Check))
                    .map_err(|e| enrol_error(&namespace, &name, e))?;
            }
            Ok(None)
        }
        Command::Del => {
            // Never fails: the pod is going away whatever we say, and an
            // agent that is down reconciles the vanished netns on its own.
            if let Err(e) = api::call(&conf.agent_socket, &req(Op::Del)) {
                log(&format!(
                    "{namespace}/{name}: DEL not delivered ({e}); the agent prunes it"
                ));
            }
            Ok(None)
        }
        Command::Version => unreachable!("answered above"),
    }
}

fn enrol_error(namespace: &str, name: &str, e: api::CallError) -> CniError {
    let code = match e {
        api::CallError::Refused(_) => code::ENROL_FAILED,
        _ => code::TRY_AGAIN_LATER,
    };
    CniError::new(
        code,
        format!("pod {namespace}/{name} is ambient but could not be enrolled"),
        e.to_string(),
    )
}

fn membership(conf: &NetConf, namespace: &str, name: &str) -> Result<Membership, CniError> {
    let path = conf.mesh_config.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "mesh_config is not set in the istio-cni network config",
            "the standalone mesh file membership is decided from",
        )
    })?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        CniError::new(
            code::IO,
            format!("cannot read mesh config {}", path.display()),
            e.to_string(),
        )
    })?;
    let state = mesh::standalone::parse(&text, identity::DEFAULT_TRUST_DOMAIN).map_err(|e| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("mesh config {} is invalid", path.display()),
            e.to_string(),
        )
    })?;
    // DNS capture is the agent's setting; it does not change membership.
    Ok(decide(
        &state,
        namespace,
        name,
        &conf.exclude_namespaces,
        false,
    ))
}

/// The runtime keeps stderr in its logs; stdout is the protocol.
fn log(msg: &str) {
    eprintln!("istio-cni: {msg}");
}
