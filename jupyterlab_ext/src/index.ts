import {
  ILabStatus,
  ILayoutRestorer,
  type JupyterFrontEnd,
  type JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { PageConfig } from '@jupyterlab/coreutils';

import { RemoteGpuModel } from './model';
import { RemoteGpuPanel } from './panel';
import { ServerExtensionApi } from './request';

/**
 * The page config key (``labconfig/page_config.json``) of the milliseconds
 * between the sidebar's refreshes while no kernel runs (default 3000).
 */
export const INTERVAL_OPTION = 'remoteGpuRefreshInterval';

function interval(): number | undefined {
  const value = Number(PageConfig.getOption(INTERVAL_OPTION));
  return Number.isFinite(value) && value > 0 ? value : undefined;
}

/**
 * The "Remote GPU" sidebar on the left: GPUs, queue, lease and jobs. It
 * refreshes as JupyterLab's kernels start and stop running (`ILabStatus`).
 */
const plugin: JupyterFrontEndPlugin<void> = {
  id: 'remote-gpu-lab:sidebar',
  description: 'A sidebar that shows the Remote GPU queue and GPU usage live.',
  autoStart: true,
  optional: [ILayoutRestorer, ILabStatus],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null,
    status: ILabStatus | null
  ): void => {
    const model = new RemoteGpuModel({
      api: new ServerExtensionApi(),
      interval: interval(),
      busy: status?.busySignal
    });
    const panel = new RemoteGpuPanel(model);
    app.shell.add(panel, 'left', { rank: 900 });
    restorer?.add(panel, panel.id);
  }
};

export default plugin;
