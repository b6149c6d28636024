//! `airlock net`: a running sandbox's egress policy, shown or replaced
//! (as E2B's `PUT /sandboxes/{id}/network`).

use std::process::ExitCode;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::net::{self, NetError, Policy};
use airlock_runtime::state::{SandboxId, StateDir};

use crate::common;

/// Show a sandbox's egress policy, or replace it while it runs: the new
/// --allow-out/--deny-out entries take effect at once for new connections
/// and DNS queries (the sandbox must have been created with --net egress).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sandbox
    id: String,
    /// Allow outbound traffic to a CIDR, IP, domain or *.domain
    /// (repeatable; allow beats deny)
    #[arg(long, value_name = "CIDR|IP|DOMAIN")]
    allow_out: Vec<String>,
    /// Deny outbound traffic to a CIDR or IP (repeatable)
    #[arg(long, value_name = "CIDR|IP")]
    deny_out: Vec<String>,
    /// Replace the policy with an empty one (the default denials stay)
    #[arg(long, conflicts_with_all = ["allow_out", "deny_out"])]
    clear: bool,
    /// Print the policy as JSON
    #[arg(long)]
    json: bool,
}

pub async fn main(config: &RuntimeConfig, args: Args) -> ExitCode {
    match run(config, &args) {
        Ok(policy) => {
            if args.json {
                println!("{}", serde_json::to_string(&policy).unwrap_or_default());
            } else {
                print(&policy);
            }
            ExitCode::SUCCESS
        }
        Err(e) => common::fail(&e),
    }
}

fn run(config: &RuntimeConfig, args: &Args) -> Result<Policy, String> {
    // Bad entries are refused before the sandbox is looked at.
    let new = match args.clear || !(args.allow_out.is_empty() && args.deny_out.is_empty()) {
        true => Some(
            net::settings::policy(&args.allow_out, &args.deny_out)
                .map_err(|e| common::error_line(&e))?,
        ),
        false => None,
    };
    let id = SandboxId::parse(&args.id).map_err(|e| common::error_line(&e))?;
    let state = StateDir::open(&config.state_dir, &id).map_err(|e| common::error_line(&e))?;
    let err = |e: NetError| common::error_line(&e);
    match new {
        Some(policy) => {
            net::update_policy(state.path(), id.as_str(), &policy).map_err(err)?;
            Ok(policy)
        }
        None => {
            if net::NetRecord::read(state.path()).map_err(err)?.is_none() {
                return Err(err(NetError::NoNetwork(id.to_string())));
            }
            net::read_policy(state.path()).map_err(err)
        }
    }
}

fn print(policy: &Policy) {
    let list = |v: Vec<String>| match v.is_empty() {
        true => "(none)".to_string(),
        false => v.join(" "),
    };
    println!(
        "allow-out: {}",
        list(policy.allow.iter().map(|r| r.to_string()).collect())
    );
    println!(
        "deny-out:  {}",
        list(policy.deny.iter().map(|n| n.to_string()).collect())
    );
    println!(
        "default denials (unless allowed by address): the host's addresses, {}",
        Policy::default_denials()
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
}
