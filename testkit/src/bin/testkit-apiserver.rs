//! Runs the in-memory Kubernetes API server until Ctrl-C, for kubectl experiments:
//! `kubectl --kubeconfig <printed path> get ns`.

use testkit::apiserver::ApiServer;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let server = ApiServer::start().await?;
    println!("url: {}", server.url());
    println!("kubeconfig: {}", server.kubeconfig_path().display());
    println!(
        "try: kubectl --kubeconfig {} get namespaces",
        server.kubeconfig_path().display()
    );
    tokio::signal::ctrl_c().await?;
    drop(server);
    Ok(())
}
