import {
  ILayoutRestorer,
  type JupyterFrontEnd,
  type JupyterFrontEndPlugin
} from '@jupyterlab/application';

import { RemoteGpuModel } from './model';
import { RemoteGpuPanel } from './panel';
import { ServerExtensionApi } from './request';

/** The "Remote GPU" sidebar on the left: GPUs, queue, lease and jobs. */
const plugin: JupyterFrontEndPlugin<void> = {
  id: 'remote-gpu-lab:sidebar',
  description: 'A sidebar that shows the Remote GPU queue and GPU usage live.',
  autoStart: true,
  optional: [ILayoutRestorer],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null): void => {
    const model = new RemoteGpuModel({ api: new ServerExtensionApi() });
    const panel = new RemoteGpuPanel(model);
    app.shell.add(panel, 'left', { rank: 900 });
    restorer?.add(panel, panel.id);
  }
};

export default plugin;
